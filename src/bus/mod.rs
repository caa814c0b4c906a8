//! Buses: one owner task per bus serialises all traffic on it, schedules device polls, backs off
//! devices that stopped answering, and hands derived events to the store writer.

pub mod link;

use crate::config::{Bus, Config, Device, Profile};
use crate::device::derive::{Deriver, Snapshot};
use crate::device::{Raw, ReadPlan};
use crate::store::{Derived, Store, WriterHandle};
use link::{Link, TxError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What `status` shows about one device.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DeviceHealth {
    /// Bus name.
    pub bus: String,
    /// Whether the last poll succeeded.
    pub online: bool,
    /// Unix ms of the last successful poll.
    pub last_ok_ms: u64,
    /// Successful polls since start.
    pub polls: u64,
    /// Failed polls since start.
    pub failures: u64,
    /// Last error.
    pub last_error: Option<String>,
    /// Duration of the last poll in ms.
    pub latency_ms: f64,
}

/// What `status` shows about one bus.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BusHealth {
    /// Transactions since start.
    pub transactions: u64,
    /// Timeouts since start.
    pub timeouts: u64,
    /// Invalid replies (CRC errors, garbage, wrong length) since start.
    pub invalid: u64,
    /// Modbus exception replies since start.
    pub exceptions: u64,
    /// Port or connection failures since start.
    pub transport_errors: u64,
    /// Time spent in transactions, ms.
    pub busy_ms: f64,
    /// Unix ms when the bus task started.
    pub since_ms: u64,
    /// Unix ms of the last completed poll or probe (watchdog).
    pub last_activity_ms: u64,
    /// Longest back-off: the task is stuck when silent for much longer than this.
    pub backoff_max_ms: u64,
    /// Longest a poll may take (all its timeouts and resyncs), plus margin.
    pub poll_slack_ms: u64,
}

/// Health of devices and buses, shared with `status`, the watchdog and the remote-config gate.
#[derive(Debug, Default)]
pub struct HealthState {
    /// By device name.
    pub devices: BTreeMap<String, DeviceHealth>,
    /// By bus name.
    pub buses: BTreeMap<String, BusHealth>,
}

/// Shared view of all devices' and buses' health.
pub type Health = Arc<Mutex<HealthState>>;

struct Dev {
    cfg: Device,
    poll: Duration,
    profile: Arc<Profile>,
    plan: ReadPlan,
    deriver: Deriver,
    next_due: Instant,
    failures_in_row: u32,
}

/// A write of one point, queued ahead of routine polls.
#[derive(Debug)]
pub struct WriteCommand {
    /// Device name.
    pub device: String,
    /// The point (must be writable).
    pub point: crate::config::Point,
    /// Engineering value.
    pub value: crate::device::codec::Value,
    /// Where the outcome goes.
    pub reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// The owner task of one bus.
pub struct BusTask {
    cfg: Bus,
    link: Link,
    devices: Vec<Dev>,
    writer: WriterHandle,
    health: Health,
    commands: tokio::sync::mpsc::Receiver<WriteCommand>,
    commands_tx: tokio::sync::mpsc::Sender<WriteCommand>,
}

impl std::fmt::Debug for BusTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusTask")
            .field("bus", &self.cfg.name)
            .finish()
    }
}

/// Problems building a bus task.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A profile cannot be read in valid Modbus transactions.
    #[error("device {device}: cannot plan reads: {error}")]
    Plan {
        /// Device.
        device: String,
        /// Cause.
        error: crate::device::plan::PlanError,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl BusTask {
    /// Builds the task for `bus`, restoring each device's last committed snapshot.
    pub fn new(
        config: &Config,
        bus: &Bus,
        store: &Store,
        writer: WriterHandle,
        health: Health,
    ) -> Result<BusTask, BusError> {
        let mut devices = Vec::new();
        let start = Instant::now();
        for (i, d) in config
            .devices
            .iter()
            .filter(|d| d.bus == bus.name)
            .enumerate()
        {
            let Some(profile) = config.profile_of(d).cloned() else {
                continue;
            };
            let plan = ReadPlan::new(&profile, bus.max_gap).map_err(|error| BusError::Plan {
                device: d.name.clone(),
                error,
            })?;
            let snap: Option<Snapshot> = store
                .snapshot(&d.name)?
                .and_then(|b| serde_json::from_slice(&b).ok());
            let deriver = Deriver::new(&d.name, profile.clone(), snap);
            // Spread the first polls so that devices with one period do not all fire at once.
            let next_due = start + Duration::from_millis(i as u64 * 5);
            devices.push(Dev {
                poll: config.poll_of(d),
                cfg: d.clone(),
                profile,
                plan,
                deriver,
                next_due,
                failures_in_row: 0,
            });
            let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
            h.devices.insert(
                d.name.clone(),
                DeviceHealth {
                    bus: bus.name.clone(),
                    ..Default::default()
                },
            );
        }
        if !devices.is_empty() {
            let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
            let now = crate::event::now_ms();
            let b = h.buses.entry(bus.name.clone()).or_default();
            b.since_ms = now;
            b.last_activity_ms = now;
            b.backoff_max_ms = bus.backoff_max.as_millis() as u64;
            let per_try = bus.timeout.as_millis() as u64 * 20 * (bus.retries as u64 + 1);
            b.poll_slack_ms = per_try.max(10_000);
        }
        let (commands_tx, commands) = tokio::sync::mpsc::channel(16);
        Ok(BusTask {
            cfg: bus.clone(),
            link: Link::new(bus),
            devices,
            writer,
            health,
            commands,
            commands_tx,
        })
    }

    /// The bus name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Where commands for this bus's devices go.
    pub fn commands(&self) -> tokio::sync::mpsc::Sender<WriteCommand> {
        self.commands_tx.clone()
    }

    /// Executes a write; the device is polled right after so that the new value is reported.
    async fn write(&mut self, cmd: &WriteCommand) -> Result<(), String> {
        use crate::device::codec::{self, Table};
        let Some(i) = self.devices.iter().position(|d| d.cfg.name == cmd.device) else {
            return Err(format!(
                "device {} is not on bus {}",
                cmd.device, self.cfg.name
            ));
        };
        let unit = self.devices[i].cfg.unit;
        let p = &cmd.point;
        let result = match (p.table, p.bit) {
            (Table::Coil, _) => {
                let on = codec::encode_bit(&cmd.value).map_err(|e| e.to_string())?;
                self.link.write_coil(unit, p.address, on).await
            }
            (Table::Holding, Some(bit)) => {
                let on = codec::encode_bit(&cmd.value).map_err(|e| e.to_string())?;
                let span = crate::device::plan::ReadSpan {
                    table: Table::Holding,
                    start: p.address,
                    count: 1,
                };
                let reg = match self
                    .link
                    .read(unit, span)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    crate::device::Raw::Registers(r) => r.first().copied().unwrap_or(0),
                    crate::device::Raw::Bits(_) => return Err("unexpected bit reply".into()),
                };
                let reg = codec::set_bit(reg, bit, on).map_err(|e| e.to_string())?;
                self.link.write_registers(unit, p.address, vec![reg]).await
            }
            (Table::Holding, None) => {
                let regs =
                    codec::encode_registers(&cmd.value, p.ty, p.order, p.scale, p.offset, p.len)
                        .map_err(|e| e.to_string())?;
                self.link.write_registers(unit, p.address, regs).await
            }
            _ => return Err(format!("point {} is in a read-only table", p.name)),
        };
        self.devices[i].next_due = Instant::now();
        result.map_err(|e| e.to_string())
    }

    /// Polls devices until shutdown; commands go ahead of routine polls.
    pub async fn run(mut self, shutdown: CancellationToken) {
        if self.devices.is_empty() {
            return;
        }
        let hang = std::env::var("FLOORGATE_FAULT_HANG_BUS").is_ok_and(|b| b == self.cfg.name);
        loop {
            let (i, due) = self
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| (i, d.next_due))
                .min_by_key(|&(_, due)| due)
                .unwrap_or((0, Instant::now()));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                cmd = self.commands.recv() => {
                    if let Some(cmd) = cmd {
                        let r = self.write(&cmd).await;
                        let _ = cmd.reply.send(r);
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(due) => {}
            }
            if !self.poll(i, &shutdown).await {
                break;
            }
            if hang {
                // Fault injection for the watchdog test: the task stops making progress.
                tracing::warn!(bus = %self.cfg.name, "FLOORGATE_FAULT_HANG_BUS: bus task hangs");
                shutdown.cancelled().await;
                break;
            }
        }
        self.link.close();
    }

    /// Polls device `i`; false when the pipeline is shutting down.
    async fn poll(&mut self, i: usize, shutdown: &CancellationToken) -> bool {
        let started = Instant::now();
        let bus = self.cfg.name.clone();
        let dev = &mut self.devices[i];
        let probing = dev.failures_in_row > 0;
        // A device that stopped answering gets one probe transaction, no retries.
        let retries = if probing { 0 } else { self.cfg.retries };
        let spans: Vec<_> = if probing {
            dev.plan.spans.iter().take(1).copied().collect()
        } else {
            dev.plan.spans.clone()
        };
        let mut raws: Vec<Raw> = Vec::with_capacity(spans.len());
        let mut error: Option<TxError> = None;
        'spans: for span in spans {
            let mut attempt = 0;
            loop {
                if shutdown.is_cancelled() {
                    return false;
                }
                let t0 = Instant::now();
                let r = self.link.read(dev.cfg.unit, span).await;
                let took = t0.elapsed();
                {
                    let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(b) = h.buses.get_mut(&bus) {
                        b.transactions += 1;
                        b.busy_ms += took.as_secs_f64() * 1e3;
                        match &r {
                            Err(TxError::Timeout) => b.timeouts += 1,
                            Err(TxError::Invalid(_)) => b.invalid += 1,
                            Err(TxError::Exception { .. }) => b.exceptions += 1,
                            Err(TxError::Transport(_)) => b.transport_errors += 1,
                            Ok(_) => {}
                        }
                    }
                }
                crate::metrics::count(
                    "floorgate_bus_transactions_total",
                    "Modbus transactions.",
                    &[("bus", &bus)],
                    1,
                );
                match r {
                    Ok(raw) => {
                        raws.push(raw);
                        continue 'spans;
                    }
                    Err(e) => {
                        crate::metrics::count(
                            "floorgate_bus_errors_total",
                            "Failed Modbus transactions by kind (timeout, exception, transport, invalid).",
                            &[("bus", &bus), ("device", &dev.cfg.name), ("kind", e.label())],
                            1,
                        );
                        tracing::debug!(bus = %bus, device = %dev.cfg.name, error = %e, attempt, "transaction failed");
                        attempt += 1;
                        if attempt > retries || matches!(e, TxError::Exception { .. }) {
                            error = Some(e);
                            break 'spans;
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        let latency = now - started;
        let (events, ok) = match error {
            None if probing => {
                // The probe answered: poll the whole device right away.
                dev.failures_in_row = 0;
                dev.next_due = now;
                return true;
            }
            None => {
                let values = dev.plan.decode(&dev.profile, &raws);
                dev.failures_in_row = 0;
                dev.next_due = next_due(dev.next_due, dev.poll, now);
                (dev.deriver.on_values(now.into_std(), &values), None)
            }
            Some(e) => {
                if dev.failures_in_row == 0 {
                    tracing::warn!(bus = %bus, device = %dev.cfg.name, error = %e, "device stopped answering; backing off");
                }
                dev.failures_in_row = dev.failures_in_row.saturating_add(1);
                let backoff = dev
                    .cfg
                    .poll
                    .max(Duration::from_millis(500))
                    .saturating_mul(1u32 << dev.failures_in_row.min(16))
                    .min(self.cfg.backoff_max.max(dev.poll));
                dev.next_due = now + backoff;
                (dev.deriver.on_offline(&e.to_string()), Some(e))
            }
        };
        {
            let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = h.buses.get_mut(&bus) {
                b.last_activity_ms = crate::event::now_ms();
            }
            if let Some(h) = h.devices.get_mut(&dev.cfg.name) {
                h.online = dev.deriver.online();
                h.latency_ms = latency.as_secs_f64() * 1e3;
                match &ok {
                    None => {
                        h.polls += 1;
                        h.last_ok_ms = crate::event::now_ms();
                    }
                    Some(e) => {
                        h.failures += 1;
                        h.last_error = Some(e.to_string());
                    }
                }
            }
        }
        crate::metrics::count(
            "floorgate_device_polls_total",
            "Device polls by result.",
            &[
                ("device", &dev.cfg.name),
                ("result", if ok.is_none() { "ok" } else { "failed" }),
            ],
            1,
        );
        crate::metrics::observe(
            "floorgate_poll_duration_seconds",
            "Duration of one device poll (all its transactions).",
            &[("bus", &bus)],
            latency.as_secs_f64(),
        );
        crate::metrics::gauge(
            "floorgate_device_online",
            "1 when the device answered its last poll.",
            &[("device", &dev.cfg.name)],
            if dev.deriver.online() { 1.0 } else { 0.0 },
        );
        if !events.is_empty() {
            let d = Derived {
                events,
                snapshot: Some((dev.cfg.name.clone(), dev.deriver.snapshot_bytes())),
            };
            if !self.writer.send(d).await {
                return false;
            }
        }
        true
    }
}

/// The next poll time: one period after the previous due time, so that a short stall of the bus
/// (another device's timeout) is caught up and the device keeps its rate; after a longer stall
/// the schedule restarts from now instead of bursting.
fn next_due(prev: Instant, period: Duration, now: Instant) -> Instant {
    let next = prev + period;
    if next + period * 2 < now {
        now
    } else {
        next
    }
}
