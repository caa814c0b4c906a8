//! Group commit: pollers hand in events with the snapshot they were derived from; the writer
//! commits whatever arrived within one `commit_interval` in a single durable batch.
//!
//! When a group cannot be written (disk full, read-only, I/O errors) the store holds it and the
//! writer stops taking events: the channel is bounded, so pollers wait in `send` and memory stays
//! bounded (one group plus the channel). Counters are totals on the device, so the increments
//! made meanwhile are in the next delta. The writer reports it (log, metrics; the daemon adds
//! status, health and systemd) and retries with a back-off until the store commits the held
//! group; a store that sled failed waits for the daemon's restart instead (see `store`).

use super::Store;
use crate::event::Event;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Derived batches the channel holds before pollers wait.
const CHANNEL: usize = 1024;
/// Derived batches in one group commit at most.
const GROUP: usize = 4096;
/// Back-off between recovery attempts: from the first to the last.
const RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(2));
/// A failing store is reported again at this period.
const REMIND: Duration = Duration::from_secs(60);

/// Events derived from one reading, with the device snapshot they leave behind.
#[derive(Debug)]
pub struct Derived {
    /// New events, in order.
    pub events: Vec<Event>,
    /// Device name and its snapshot after these events.
    pub snapshot: Option<(String, Vec<u8>)>,
}

/// Where pollers send what they derived.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Derived>,
}

impl WriterHandle {
    /// Hands derived events to the writer; waits when the writer is behind or the store does
    /// not take writes (backpressure).
    pub async fn send(&self, d: Derived) -> bool {
        self.tx.send(d).await.is_ok()
    }
}

/// The group-commit task.
#[derive(Debug)]
pub struct Writer {
    store: Arc<Store>,
    rx: mpsc::Receiver<Derived>,
    interval: Duration,
}

fn beat() {
    crate::metrics::WRITER_BEAT_MS
        .store(crate::event::now_ms(), std::sync::atomic::Ordering::Relaxed);
}

impl Writer {
    /// A writer and the handle pollers use.
    pub fn new(store: Arc<Store>, interval: Duration) -> (Writer, WriterHandle) {
        let (tx, rx) = mpsc::channel(CHANNEL);
        (
            Writer {
                store,
                rx,
                interval,
            },
            WriterHandle { tx },
        )
    }

    /// Runs until `shutdown`, then commits what is still queued.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut pending: Vec<Derived> = Vec::new();
        // Gauges also move when the uplink drains without new commits.
        let mut gauges = tokio::time::interval(Duration::from_millis(500));
        let hang = std::env::var_os("FLOORGATE_FAULT_HANG_WRITER").is_some();
        loop {
            beat();
            if self.store.unwritable().is_some() {
                // A held group (also one left by the previous pipeline) goes first.
                if !self.recover(&shutdown).await {
                    break;
                }
                continue;
            }
            while pending.is_empty() {
                tokio::select! {
                    biased;
                    d = self.rx.recv() => match d {
                        Some(d) => pending.push(d),
                        None => break,
                    },
                    _ = shutdown.cancelled() => break,
                    _ = gauges.tick() => {
                        publish_gauges(&self.store);
                        beat();
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
            let deadline = Instant::now() + self.interval;
            loop {
                tokio::select! {
                    d = self.rx.recv() => match d {
                        Some(d) => pending.push(d),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = shutdown.cancelled() => break,
                }
                if pending.len() >= GROUP {
                    break;
                }
            }
            self.commit(std::mem::take(&mut pending)).await;
            if shutdown.is_cancelled() {
                break;
            }
            if hang {
                // Fault injection for the watchdog test: the writer stops making progress.
                tracing::warn!("FLOORGATE_FAULT_HANG_WRITER: the writer hangs");
                shutdown.cancelled().await;
                break;
            }
        }
        while let Ok(d) = self.rx.try_recv() {
            pending.push(d);
        }
        if self.store.unwritable().is_some() {
            self.attempt().await;
        }
        if self.store.unwritable().is_none() {
            self.commit(std::mem::take(&mut pending)).await;
        }
        if let Some(u) = self.store.unwritable() {
            let queued: usize = pending.iter().map(|d| d.events.len()).sum();
            tracing::error!(
                error = %u.error,
                held_events = u.held_events,
                queued_events = queued,
                "store not writable while the writer stops: queued events are derived again by the next pollers from the held snapshots; held events are committed later, or derived again after a restart"
            );
        }
    }

    /// Commits a group; on failure the store holds it and the failure is reported.
    async fn commit(&self, pending: Vec<Derived>) {
        if pending.is_empty() {
            return;
        }
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let (events, snapshots) = group(pending);
            store.commit_group(events, snapshots)
        })
        .await;
        match result {
            Ok(Ok(_)) => {
                crate::metrics::STORE_COMMITS.inc();
                publish_gauges(&self.store);
            }
            Ok(Err(error)) => {
                crate::metrics::STORE_ERRORS.inc();
                publish_gauges(&self.store);
                let u = self.store.unwritable();
                let held_events = u.as_ref().map_or(0, |u| u.held_events);
                if u.is_some_and(|u| u.failed) {
                    tracing::error!(
                        %error,
                        held_events,
                        "store write failed: holding the events in memory, devices wait; floorgate restarts once the state directory takes writes again"
                    );
                } else {
                    tracing::error!(
                        %error,
                        held_events,
                        "store not writable: holding the events in memory, devices wait; retrying"
                    );
                }
            }
            Err(join) => {
                tracing::error!(error = %join, "store commit task failed");
            }
        }
    }

    /// One attempt to commit the held group; true when the store takes writes again.
    async fn attempt(&self) -> bool {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.recover()).await {
            Ok(Ok(Some(r))) => {
                crate::metrics::STORE_COMMITS.inc();
                publish_gauges(&self.store);
                tracing::warn!(
                    events = r.events,
                    unwritable_s = r.unwritable_ms / 1000,
                    "store writable again: {} held events committed",
                    r.events
                );
                true
            }
            Ok(Ok(None)) => true,
            Ok(Err(error)) => {
                crate::metrics::STORE_ERRORS.inc();
                tracing::debug!(%error, "store still not writable");
                false
            }
            Err(join) => {
                tracing::error!(error = %join, "store recovery task failed");
                false
            }
        }
    }

    /// Retries the held group with a back-off until it is committed (true) or `shutdown`.
    /// Takes no events meanwhile: pollers wait on the bounded channel.
    async fn recover(&self, shutdown: &CancellationToken) -> bool {
        let mut wait = RETRY.0;
        let mut reminded = Instant::now();
        loop {
            publish_gauges(&self.store);
            beat();
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
            beat();
            if self.attempt().await {
                return true;
            }
            wait = (wait * 2).min(RETRY.1);
            if reminded.elapsed() >= REMIND {
                reminded = Instant::now();
                if let Some(u) = self.store.unwritable() {
                    tracing::error!(
                        error = %u.error,
                        held_events = u.held_events,
                        unwritable_s = crate::event::now_ms().saturating_sub(u.since_ms) / 1000,
                        "store still not writable; devices wait"
                    );
                }
            }
        }
    }
}

/// The events of a group in order, and the last snapshot of each device.
fn group(pending: Vec<Derived>) -> (Vec<Event>, Vec<(String, Vec<u8>)>) {
    let mut events = Vec::with_capacity(pending.iter().map(|d| d.events.len()).sum());
    let mut snaps: HashMap<String, Vec<u8>> = HashMap::new();
    for d in pending {
        events.extend(d.events);
        if let Some((dev, snap)) = d.snapshot {
            snaps.insert(dev, snap);
        }
    }
    (events, snaps.into_iter().collect())
}

/// Updates the store gauges (depth, bytes, drops, writability).
pub(crate) fn publish_gauges(store: &Store) {
    let st = store.stats();
    let unwritable = store.unwritable();
    crate::metrics::gauge(
        "floorgate_store_failing",
        "1 while the store does not take writes (disk full, read-only, I/O errors).",
        &[],
        if unwritable.is_some() { 1.0 } else { 0.0 },
    );
    crate::metrics::gauge(
        "floorgate_store_held_events",
        "Events held in memory because the store does not take writes.",
        &[],
        unwritable.map_or(0.0, |u| u.held_events as f64),
    );
    crate::metrics::gauge(
        "floorgate_store_events",
        "Events held in the store.",
        &[],
        st.events as f64,
    );
    crate::metrics::gauge(
        "floorgate_store_bytes",
        "Bytes of events held in the store.",
        &[],
        st.bytes as f64,
    );
    crate::metrics::gauge(
        "floorgate_store_next_seq",
        "Next sequence number.",
        &[],
        st.next_seq as f64,
    );
    crate::metrics::gauge(
        "floorgate_store_tombstones",
        "Keys of blocks deleted while a backlog drained, removed once it is drained.",
        &[],
        st.tombstones as f64,
    );
    crate::metrics::gauge(
        "floorgate_store_dropped",
        "Events dropped because the store was full, since start.",
        &[],
        st.dropped as f64,
    );
}
