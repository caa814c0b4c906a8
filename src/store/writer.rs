//! Group commit: pollers hand in events with the snapshot they were derived from; the writer
//! commits whatever arrived within one `commit_interval` in a single durable batch.

use super::{Store, StoreError};
use crate::event::Event;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// Hands derived events to the writer; waits when the writer is behind (backpressure).
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
    /// Set while the last commit failed (e.g. disk full); read by status and metrics.
    pub failing: Arc<std::sync::atomic::AtomicBool>,
}

impl Writer {
    /// A writer and the handle pollers use.
    pub fn new(store: Arc<Store>, interval: Duration) -> (Writer, WriterHandle) {
        let (tx, rx) = mpsc::channel(1024);
        (
            Writer {
                store,
                rx,
                interval,
                failing: Arc::default(),
            },
            WriterHandle { tx },
        )
    }

    /// Runs until `shutdown`, then commits what is still queued.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut pending: Vec<Derived> = Vec::new();
        // Gauges also move when the uplink drains without new commits.
        let mut gauges = tokio::time::interval(Duration::from_millis(500));
        loop {
            crate::metrics::WRITER_BEAT_MS
                .store(crate::event::now_ms(), std::sync::atomic::Ordering::Relaxed);
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
                        crate::metrics::WRITER_BEAT_MS.store(crate::event::now_ms(), std::sync::atomic::Ordering::Relaxed);
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
                if pending.len() >= 4096 {
                    break;
                }
            }
            pending = self.commit(pending).await;
            if shutdown.is_cancelled() {
                break;
            }
        }
        while let Ok(d) = self.rx.try_recv() {
            pending.push(d);
        }
        let left = self.commit(pending).await;
        if !left.is_empty() {
            tracing::error!(batches = left.len(), "could not commit events at shutdown");
        }
    }

    /// Commits `pending`; on failure returns it to be retried (nothing is thrown away).
    async fn commit(&self, pending: Vec<Derived>) -> Vec<Derived> {
        if pending.is_empty() {
            return pending;
        }
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let r = commit_blocking(&store, &pending);
            (pending, r)
        })
        .await;
        match result {
            Ok((_, Ok(()))) => {
                self.failing
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                crate::metrics::STORE_COMMITS.inc();
                publish_gauges(&self.store);
                Vec::new()
            }
            Ok((pending, Err(error))) => {
                if !self
                    .failing
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::error!(%error, "cannot commit to the store; keeping events in memory and retrying");
                }
                crate::metrics::STORE_ERRORS.inc();
                tokio::time::sleep(Duration::from_millis(500)).await;
                pending
            }
            Err(join) => {
                tracing::error!(error = %join, "store commit task failed");
                Vec::new()
            }
        }
    }
}

fn commit_blocking(store: &Store, pending: &[Derived]) -> Result<(), StoreError> {
    let events: Vec<&Event> = pending.iter().flat_map(|d| d.events.iter()).collect();
    let mut snaps: HashMap<&str, &[u8]> = HashMap::new();
    for d in pending {
        if let Some((dev, snap)) = &d.snapshot {
            snaps.insert(dev, snap);
        }
    }
    let snaps: Vec<(String, Vec<u8>)> = snaps
        .into_iter()
        .map(|(d, s)| (d.to_string(), s.to_vec()))
        .collect();
    store.commit(&events, &snaps)?;
    Ok(())
}

/// Updates the store gauges (depth, bytes, drops).
pub(crate) fn publish_gauges(store: &Store) {
    let st = store.stats();
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
        "floorgate_store_dropped",
        "Events dropped because the store was full, since start.",
        &[],
        st.dropped as f64,
    );
}
