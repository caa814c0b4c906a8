//! The durable queue of events and the devices' last snapshots. The only module that knows sled.
//!
//! One sled tree holds everything, so that one `Batch` commits events, snapshots and counters
//! atomically; `flush()` is the durability point.
//!
//! Keys: `k`+seq (kept events), `t`+seq (telemetry, shed first), `s`+device (snapshot),
//! `m`+name (meta: next seq, byte and event counts), `c`+id (command outcomes).

mod writer;

pub(crate) use writer::publish_gauges;
pub use writer::{Derived, Writer, WriterHandle};

use crate::event::{Body, Class, Event};
use std::path::Path;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an error (disk full, I/O error, corruption).
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// The state directory could not be prepared.
    #[error("store directory {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// An event as stored: its seq, class and wire JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Sequence number.
    pub seq: u64,
    /// Storage class.
    pub class: Class,
    /// Wire JSON of the event.
    pub json: Vec<u8>,
}

/// Counters of the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Events held.
    pub events: u64,
    /// Telemetry events held.
    pub telemetry: u64,
    /// Bytes of keys and values of held events.
    pub bytes: u64,
    /// Next seq to assign.
    pub next_seq: u64,
    /// Oldest seq held.
    pub oldest_seq: Option<u64>,
    /// Events dropped because the store was full, since start.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Meta {
    next_seq: u64,
    bytes: u64,
    events: u64,
    telemetry: u64,
    dropped: u64,
}

/// The durable store.
#[derive(Debug)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    max_bytes: u64,
    meta: Mutex<Meta>,
    committed: Notify,
}

const M_NEXT: &[u8] = b"mnext_seq";
const M_BYTES: &[u8] = b"mbytes";
const M_EVENTS: &[u8] = b"mevents";
const M_TELEMETRY: &[u8] = b"mtelemetry";

fn key(class: Class, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = match class {
        Class::Keep => b'k',
        Class::Telemetry => b't',
    };
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if k.len() == 9 {
        b.copy_from_slice(&k[1..]);
    }
    u64::from_be_bytes(b)
}

fn read_u64(tree: &sled::Tree, k: &[u8]) -> Result<u64, StoreError> {
    Ok(tree
        .get(k)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

fn lock(m: &Mutex<Meta>) -> std::sync::MutexGuard<'_, Meta> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Opens (or creates) the store in `dir` with a small page cache.
    pub fn open(dir: &Path, cache_bytes: u64, max_bytes: u64) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let db = sled::Config::new()
            .path(dir.join("store"))
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .mode(sled::Mode::LowSpace)
            .open()?;
        let tree = db.open_tree("floorgate")?;
        let meta = Meta {
            next_seq: read_u64(&tree, M_NEXT)?.max(1),
            bytes: read_u64(&tree, M_BYTES)?,
            events: read_u64(&tree, M_EVENTS)?,
            telemetry: read_u64(&tree, M_TELEMETRY)?,
            dropped: 0,
        };
        Ok(Store {
            db,
            tree,
            max_bytes,
            meta: Mutex::new(meta),
            committed: Notify::new(),
        })
    }

    /// Waits until a commit added events.
    pub async fn committed(&self) {
        self.committed.notified().await;
    }

    /// Wakes waiters of [`Store::committed`] (used after a reconnect).
    pub fn wake(&self) {
        self.committed.notify_waiters();
        self.committed.notify_one();
    }

    /// Commits events and device snapshots atomically and durably. Returns the seqs assigned.
    /// When the store would exceed its bound, the oldest telemetry is dropped first, then the
    /// oldest other events, and a `gap` event reporting the drop is committed in the same batch.
    pub fn commit(
        &self,
        events: &[Event],
        snapshots: &[(String, Vec<u8>)],
    ) -> Result<std::ops::Range<u64>, StoreError> {
        let mut meta = lock(&self.meta);
        let first = meta.next_seq;
        let mut batch = sled::Batch::default();
        let mut added: Vec<([u8; 9], Vec<u8>)> = Vec::with_capacity(events.len() + 1);
        let mut seq = first;
        for e in events {
            added.push((key(e.class(), seq), e.encode(seq)));
            seq += 1;
        }
        let add_bytes: u64 = added.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
        let mut bytes = meta.bytes + add_bytes;
        let mut n_events = meta.events + added.len() as u64;
        let mut n_tel = meta.telemetry
            + events
                .iter()
                .filter(|e| e.class() == Class::Telemetry)
                .count() as u64;
        let mut gap: Option<(u64, u64, u64)> = None;
        if bytes > self.max_bytes {
            // Shed to 90 % of the bound so that a full store does not drop on every commit.
            let target = self.max_bytes / 10 * 9;
            let mut dropped_new = vec![false; added.len()];
            for class in [Class::Telemetry, Class::Keep] {
                let prefix: &[u8] = if class == Class::Telemetry {
                    b"t"
                } else {
                    b"k"
                };
                for item in self.tree.scan_prefix(prefix) {
                    if bytes <= target {
                        break;
                    }
                    let (k, v) = item?;
                    bytes -= (k.len() + v.len()) as u64;
                    n_events -= 1;
                    if class == Class::Telemetry {
                        n_tel -= 1;
                    }
                    let s = seq_of(&k);
                    gap = Some(gap.map_or((1, s, s), |(n, a, b)| (n + 1, a.min(s), b.max(s))));
                    batch.remove(k);
                }
                // Then this commit's own events of the class, oldest first.
                for (i, (k, v)) in added.iter().enumerate() {
                    if bytes <= target {
                        break;
                    }
                    if k[0] == prefix[0] && !dropped_new[i] {
                        dropped_new[i] = true;
                        bytes -= (k.len() + v.len()) as u64;
                        n_events -= 1;
                        if class == Class::Telemetry {
                            n_tel -= 1;
                        }
                        let s = seq_of(k);
                        gap = Some(gap.map_or((1, s, s), |(n, a, b)| (n + 1, a.min(s), b.max(s))));
                    }
                }
            }
            added = added
                .into_iter()
                .zip(dropped_new)
                .filter_map(|(a, d)| (!d).then_some(a))
                .collect();
        }
        if let Some((dropped, first_seq, last_seq)) = gap {
            meta.dropped += dropped;
            let e = Event::now(
                None,
                Body::Gap {
                    dropped,
                    first_seq,
                    last_seq,
                },
            );
            let k = key(Class::Keep, seq);
            let v = e.encode(seq);
            bytes += (k.len() + v.len()) as u64;
            n_events += 1;
            added.push((k, v));
            seq += 1;
            tracing::warn!(
                dropped,
                first_seq,
                last_seq,
                "store full: dropped oldest events"
            );
        }
        for (k, v) in &added {
            batch.insert(&k[..], v.as_slice());
        }
        for (device, snap) in snapshots {
            let mut k = Vec::with_capacity(device.len() + 1);
            k.push(b's');
            k.extend_from_slice(device.as_bytes());
            batch.insert(k, snap.as_slice());
        }
        batch.insert(M_NEXT, &seq.to_be_bytes());
        batch.insert(M_BYTES, &bytes.to_be_bytes());
        batch.insert(M_EVENTS, &n_events.to_be_bytes());
        batch.insert(M_TELEMETRY, &n_tel.to_be_bytes());
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        meta.next_seq = seq;
        meta.bytes = bytes;
        meta.events = n_events;
        meta.telemetry = n_tel;
        drop(meta);
        if seq > first {
            self.committed.notify_one();
        }
        Ok(first..seq)
    }

    /// Appends a `gap` event reporting events removed outside the bound (e.g. a purge).
    pub fn commit_gap(
        &self,
        dropped: u64,
        first_seq: u64,
        last_seq: u64,
    ) -> Result<(), StoreError> {
        let e = Event::now(
            None,
            Body::Gap {
                dropped,
                first_seq,
                last_seq,
            },
        );
        self.commit(&[e], &[]).map(|_| ())
    }

    /// The last committed snapshot of a device.
    pub fn snapshot(&self, device: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut k = vec![b's'];
        k.extend_from_slice(device.as_bytes());
        Ok(self.tree.get(k)?.map(|v| v.to_vec()))
    }

    /// Up to `max` stored events with seq >= `from`, in seq order.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Stored>, StoreError> {
        let mut keep = self
            .tree
            .range(key(Class::Keep, from)..key(Class::Keep, u64::MAX));
        let mut tel = self
            .tree
            .range(key(Class::Telemetry, from)..key(Class::Telemetry, u64::MAX));
        let mut out = Vec::with_capacity(max.min(1024));
        let mut a = keep.next().transpose()?;
        let mut b = tel.next().transpose()?;
        while out.len() < max {
            let take_a = match (&a, &b) {
                (Some((ka, _)), Some((kb, _))) => seq_of(ka) < seq_of(kb),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_a {
                if let Some((k, v)) = a.take() {
                    out.push(Stored {
                        seq: seq_of(&k),
                        class: Class::Keep,
                        json: v.to_vec(),
                    });
                }
                a = keep.next().transpose()?;
            } else {
                if let Some((k, v)) = b.take() {
                    out.push(Stored {
                        seq: seq_of(&k),
                        class: Class::Telemetry,
                        json: v.to_vec(),
                    });
                }
                b = tel.next().transpose()?;
            }
        }
        Ok(out)
    }

    /// Deletes events the broker acknowledged. Events already dropped are skipped.
    /// Not flushed here: a crash before the next flush only causes a redelivery of the same seqs.
    pub fn ack(&self, events: &[(u64, Class)]) -> Result<(), StoreError> {
        let mut meta = lock(&self.meta);
        let mut batch = sled::Batch::default();
        let (mut bytes, mut n, mut tel) = (meta.bytes, meta.events, meta.telemetry);
        for &(seq, class) in events {
            let k = key(class, seq);
            if let Some(v) = self.tree.get(k)? {
                bytes = bytes.saturating_sub((k.len() + v.len()) as u64);
                n = n.saturating_sub(1);
                if class == Class::Telemetry {
                    tel = tel.saturating_sub(1);
                }
                batch.remove(&k[..]);
            }
        }
        batch.insert(M_BYTES, &bytes.to_be_bytes());
        batch.insert(M_EVENTS, &n.to_be_bytes());
        batch.insert(M_TELEMETRY, &tel.to_be_bytes());
        self.tree.apply_batch(batch)?;
        meta.bytes = bytes;
        meta.events = n;
        meta.telemetry = tel;
        Ok(())
    }

    /// Removes every stored event; returns (count, first seq, last seq) of what was removed.
    pub fn purge(&self) -> Result<Option<(u64, u64, u64)>, StoreError> {
        let all = self.read_from(0, usize::MAX)?;
        if all.is_empty() {
            return Ok(None);
        }
        let first = all.first().map_or(0, |s| s.seq);
        let last = all.last().map_or(0, |s| s.seq);
        let n = all.len() as u64;
        self.ack(&all.iter().map(|s| (s.seq, s.class)).collect::<Vec<_>>())?;
        self.flush()?;
        Ok(Some((n, first, last)))
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let meta = lock(&self.meta);
        let oldest = |p: &[u8]| {
            self.tree
                .scan_prefix(p)
                .next()
                .and_then(Result::ok)
                .map(|(k, _)| seq_of(&k))
        };
        let oldest_seq = match (oldest(b"k"), oldest(b"t")) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Stats {
            events: meta.events,
            telemetry: meta.telemetry,
            bytes: meta.bytes,
            next_seq: meta.next_seq,
            oldest_seq,
            dropped: meta.dropped,
        }
    }

    /// Reads a small record (command outcomes, config versions) by key.
    pub fn get_record(&self, space: u8, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut k = vec![space];
        k.extend_from_slice(name.as_bytes());
        Ok(self.tree.get(k)?.map(|v| v.to_vec()))
    }

    /// Writes a small record durably.
    pub fn put_record(&self, space: u8, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut k = vec![space];
        k.extend_from_slice(name.as_bytes());
        self.tree.insert(k, value)?;
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
